"""The channel broker: sessions, authorization, publishing and delivery, through the engines."""
