# A plain CREATE INDEX: writes to the table wait while it is built.
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]
    operations = [
        migrations.AddIndex("item", models.Index(fields=["name"], name="shop_item_name_idx")),
    ]
