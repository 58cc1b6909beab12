"""The fleet-wide rate limiter and the 24-hour quota, with their Lua."""
