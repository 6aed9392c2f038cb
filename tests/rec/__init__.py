"""Tests of xkern.rec, the CLI and plots (a package so basenames cannot collide with tests/)."""
