"""`python -m prepare`: the command of prepare/command.py."""

from prepare import command

command.run()
