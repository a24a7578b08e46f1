"""Simulated paired chest X-ray / CT / report data built from a real chest CT (see docs/simulated-data.md)."""
