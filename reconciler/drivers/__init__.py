"""Drivers carry out the plan: systemd units on systemd hosts, child processes elsewhere."""
