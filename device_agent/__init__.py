"""The device agent: runs bundle artifacts with whichever runtime the device has.

Never imports edge_sdk.converters; installs without any training framework.
"""
