# A database default that is volatile (random()): PostgreSQL 15 rewrites the table.
from django.db import migrations, models
from django.db.models.functions import Random


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]
    operations = [
        migrations.AddField("item", "score", models.FloatField(db_default=Random())),
    ]
