"""``python -m deploy``: the same as the ``deployctl`` command."""

from deploy.entry import main

main()
