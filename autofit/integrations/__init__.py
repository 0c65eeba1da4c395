"""Plans applied inside other training frameworks (Lightning); each module imports its framework only when used."""
