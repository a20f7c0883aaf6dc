# Settings for the Django project tests/check.rs runs through `pgtwig check`: the database
# comes from DATABASE_URL (as pgtwig check sets it), the migrations package from
# SHOP_MIGRATIONS (one per scenario, each starting from the same 0001_initial).
import os
from urllib.parse import parse_qs, unquote, urlparse

url = urlparse(os.environ["DATABASE_URL"])
query = parse_qs(url.query)
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(url.path.lstrip("/")),
        "USER": url.username or "postgres",
        "HOST": query.get("host", [url.hostname or ""])[0],
        "PORT": str(url.port or 5432),
    }
}
INSTALLED_APPS = ["django.contrib.postgres", "shop"]
MIGRATION_MODULES = {"shop": "shop." + os.environ.get("SHOP_MIGRATIONS", "rewrite")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
SECRET_KEY = "pgtwig-check-test"
USE_TZ = True
