"""One router per resource: each translates HTTP to service calls and back."""
