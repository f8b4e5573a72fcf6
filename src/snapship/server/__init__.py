"""`snapship server`: repositories served over HTTP with token roles (docs/http-api.md)."""
