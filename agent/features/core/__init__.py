"""Core profile: Authorize, RemoteStart/Stop, ChangeAvailability, Reset, UnlockConnector..."""
