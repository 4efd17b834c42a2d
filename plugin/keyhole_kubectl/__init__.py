"""``kubectl keyhole``: which pods can use which key, why a pod does or does not get its key,
and how keyhole stands in a namespace — read from the API server, nothing written."""
