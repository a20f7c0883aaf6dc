"""A web app's test suite in miniature: each test runs in a transaction (Django's TestCase),
makes a few rows and asks the ORM the kind of questions views ask: many small round trips,
which is where a proxy's per-message cost shows."""
from django.db import transaction
from django.db.models import Count, Sum
from django.test import TestCase

from .models import Author, Book, Loan, Member


class LibraryTestCase(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.authors = [Author.objects.create(name=f"author {i}", born=1900 + i) for i in range(5)]
        for a in cls.authors:
            for j in range(4):
                Book.objects.create(author=a, title=f"{a.name} book {j}", year=1950 + j, pages=100 + j)
        cls.members = [Member.objects.create(email=f"m{i}@example.org") for i in range(5)]


def make_test(n):
    def test(self):
        member = self.members[n % 5]
        books = list(Book.objects.filter(year__gte=1950 + n % 4).select_related("author")[:6])
        for b in books:
            Loan.objects.create(book=b, member=member)
        self.assertEqual(member.loans.count(), len(books))
        with transaction.atomic():
            Loan.objects.filter(member=member, book__pages__lt=102).update(returned=True)
        open_loans = Loan.objects.filter(member=member, returned=False).count()
        self.assertLessEqual(open_loans, len(books))
        by_author = dict(
            Author.objects.annotate(n=Count("books__loans")).values_list("name", "n")
        )
        self.assertEqual(sum(by_author.values()), len(books))
        pages = Book.objects.filter(loans__member=member).aggregate(p=Sum("pages"))["p"]
        self.assertEqual(pages, sum(b.pages for b in books))
        a = Author.objects.get(pk=self.authors[n % 5].pk)
        a.born += 1
        a.save()
        self.assertTrue(Author.objects.filter(pk=a.pk, born=a.born).exists())
        for b in Book.objects.filter(author=a).order_by("id"):
            self.assertEqual(b.author_id, a.pk)

    return test


# 200 tests, each about 30 statements.
for n in range(200):
    setattr(LibraryTestCase, f"test_{n:03d}", make_test(n))
