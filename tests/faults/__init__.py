"""Fault injection and hostile input against real servers (issue 9); see docs/guarantees.md."""
