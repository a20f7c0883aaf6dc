from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100)
    born = models.IntegerField()


class Book(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    title = models.CharField(max_length=200)
    year = models.IntegerField()
    pages = models.IntegerField()


class Member(models.Model):
    email = models.EmailField(unique=True)
    joined = models.DateTimeField(auto_now_add=True)


class Loan(models.Model):
    book = models.ForeignKey(Book, on_delete=models.CASCADE, related_name="loans")
    member = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="loans")
    returned = models.BooleanField(default=False)
