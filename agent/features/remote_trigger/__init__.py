"""Remote Trigger profile: TriggerMessage."""
