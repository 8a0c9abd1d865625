"""Serving: the inspection service (``service``: jobs, the fair queue, limits) and its HTTP side
(``web``)."""
