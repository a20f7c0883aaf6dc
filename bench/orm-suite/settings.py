"""Django settings for the ORM suite: one PostgreSQL database from DATABASE_URL
(postgres://user@host:port/name), nothing else."""
import os
from urllib.parse import urlparse

url = urlparse(os.environ["DATABASE_URL"])
SECRET_KEY = "bench-only"
INSTALLED_APPS = ["library"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.lstrip("/") or "postgres",
        "USER": url.username or "postgres",
        "PASSWORD": url.password or "",
        "HOST": url.hostname,
        "PORT": url.port or 5432,
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
