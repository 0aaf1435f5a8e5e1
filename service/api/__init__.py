"""HTTP routers: appointments, health (/healthz, /readyz, /leader), metrics."""
