"""Plain SQL migrations, applied in file-name order by `makima.store.migrate`."""
