"""Tests of the Debian package: built from a copy of the tree, linted, installed, run, purged."""
