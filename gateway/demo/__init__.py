"""The demo, its live view and the bundled model servers."""
