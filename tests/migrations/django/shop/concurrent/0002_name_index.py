# The same index built CONCURRENTLY (outside a transaction, as it must be).
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("shop", "0001_initial")]
    operations = [
        AddIndexConcurrently("item", models.Index(fields=["name"], name="shop_item_name_idx")),
    ]
