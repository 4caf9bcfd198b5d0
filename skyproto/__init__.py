"""skyproto: skynet's harbor/master and Erlang's epmd, as a Twisted protocol suite."""

__version__ = "0.1.0"
