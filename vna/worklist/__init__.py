"""Worklist and workflow: orders from the RIS, MWL and MPPS, images bound to orders."""
