"""EnTranNAS and EnTranNAS-DST architecture search in PyTorch (no Ray needed).

Start with ``entrannas.config.SearchConfig`` and ``entrannas.search.Search`` (a search), or
``entrannas.train.evaluate`` (train a genotype from scratch); the CLI is ``entrannas-tune``.
"""

__version__ = "0.1.0"
