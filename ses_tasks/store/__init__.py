"""Redis: clients, status records and counters, suppression, their Lua."""
