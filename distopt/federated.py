"""Federated learning with distopt recipes on Flower (``pip install "distopt[fl]"``).

A short alias of :mod:`distopt.integrations.flower`::

    from distopt.federated import DigitsTask, simulate, make_client_app, make_server_app
"""
from distopt.integrations.flower import *  # noqa: F401,F403
from distopt.integrations.flower import __all__  # noqa: F401
