"""`shotcache eval`: few-shot accuracy of every method on a labelled image folder."""
