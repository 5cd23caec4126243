"""Property tests of the textbook claims imgcls is built on (listed in README.md)."""
