"""Cross-backend tests: run by ``tox -e cross`` with every backend installed. Where a backend is
missing its tests skip with the reason."""
