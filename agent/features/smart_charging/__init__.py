"""Smart Charging profile: SetChargingProfile, ClearChargingProfile, GetCompositeSchedule."""
