"""Tests of xkern.data, the CLI and plots (a package so basenames cannot collide with tests/)."""
