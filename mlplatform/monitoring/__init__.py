"""Monitoring: whylogs profiles, drift against the champion's training window, realised performance, sensors."""
