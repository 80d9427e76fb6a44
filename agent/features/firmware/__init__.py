"""Firmware Management profile: UpdateFirmware, GetDiagnostics and the installer hand-over."""
