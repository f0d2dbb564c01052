"""msp_central: the central server ("Central Command") of the MSP compliance appliance."""

__version__ = "0.1.0"
