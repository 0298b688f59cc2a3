"""Tools for tests and demos (a local SMTP sink), behind the `[lab]` extra; the product never imports them."""
