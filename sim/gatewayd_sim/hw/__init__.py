"""Emulated hardware: register-level I2C chips (`i2c`, `chips`), serial devices on pseudo-
terminals (`serial`), and the bench set-up of both (`bench`)."""
