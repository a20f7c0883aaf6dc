#!/usr/bin/env python3
"""The ORM suite bench/orm-suite.sh times: `python manage.py test` against DATABASE_URL."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
