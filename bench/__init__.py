"""Side-by-side benchmarks of imgcls against the bare model and the template loop: `python -m bench`."""
