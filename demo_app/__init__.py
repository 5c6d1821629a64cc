"""A small token server: pyramid_powerhose's driving case, runnable.

``POST /token`` with an ES256-signed assertion returns a tokenlib token;
checking the signature is pure-Python, GIL-holding CPU work, so it runs
in powerhose workers (``demo_app.jobs:issue_token``) while the web
process only moves bytes.  ``pserve demo_app/development.ini`` runs it.

Settings: ``powerhose.*`` for the plugin (the key, secret, issuer and
audience as ``powerhose.params.*`` reach the workers), and
``demo.offload`` (default true): false checks assertions in the view's
own thread, the baseline ``bench/web.py`` compares against.
"""

from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.settings import asbool

from . import tokens

PARAMS = "powerhose.params."


def main(global_config, **settings):
    """The WSGI app (``paste.app_factory``: ``use = egg:pyramid_powerhose#demo``)."""
    with Configurator(settings=settings) as config:
        config.include(includeme)
        if config.registry.settings["demo.offload"]:
            config.include("pyramid_powerhose")
        return config.make_wsgi_app()


def includeme(config):
    """Routes, views and the token configuration, checked at start-up.

    The workers build the same configuration from ``get_params()``; it is
    checked here too, so that a missing key or secret stops ``pserve`` with
    a message instead of failing every request.  With ``powerhose.cluster =
    attach`` the workers are configured elsewhere (circus.ini) and the web
    process needs no key and no secret.
    """
    settings = config.registry.settings
    settings["demo.offload"] = asbool(settings.get("demo.offload", True))
    attached = settings.get("powerhose.cluster", "").strip().lower() == "attach"
    if not settings["demo.offload"] or not attached:
        params = {key[len(PARAMS):]: value for key, value in settings.items()
                  if key.startswith(PARAMS)}
        try:
            config.registry.token_config = tokens.TokenConfig.from_params(params)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    config.add_route("token", "/token")
    config.add_route("heartbeat", "/__heartbeat__")
    config.scan(".views")
