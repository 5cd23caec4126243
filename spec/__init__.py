"""Property tests of the textbook claims imgcls is built on (see CLAIMS.md)."""
