"""Drives the real Genesys Cloud Python SDK (PureCloudPlatformClientV2 269) at a base URL.

Usage: python_sdk.py BASE_URL MODE CLIENT_ID CLIENT_SECRET N
  BASE_URL  http://127.0.0.1:PORT (the sidecar, or a fake that serves both login and API)
  MODE      host     set-up (a): ApiClient(host=BASE_URL), no path params
            gateway  set-up (b): api_client.set_gateway(host, "http", port,
                     path_params_login="login", path_params_api="api")
  N         client-credentials logins to make, each on its own ApiClient, all at once

Prints one JSON line on stdout (the last line):
  {"logins_ok": n, "login_errors": [401, "..."], "access_tokens": [distinct tokens],
   "users_me": {"status": 200, "body": {...}} | {"status": 401, "error": "..."}}

What the SDK requests, read from its source (api_client.py, get_conf_url):
  host     POST BASE/oauth/token        login URL = host with "//api." rewritten to "//login."
                                        (a no-op for 127.0.0.1, so an "api." sidecar host name
                                        would send logins to "login.<rest>")
           GET  BASE/api/v2/users/me    API URL = host + resource path
  gateway  POST http://H:P/login/oauth/token
           GET  http://H:P/api/api/v2/users/me   (path_params_api is prepended to the
                                                 resource path, which already starts /api/v2)
Quirks: set_gateway is a method of ApiClient, not of Configuration (Configuration only has a
gateway_configuration field, copied by every ApiClient created after it is set, and a [gateway]
section in ~/.genesyscloudpython/config). The gateway protocol defaults to https; "http" is
honoured. The login does not check the HTTP status itself: urllib3 raises ApiException for any
non-2xx, whose .status is the code. The SDK sets no request timeout, and its urllib3 Retry
retries 413/429/503 answers that carry Retry-After (up to 10 times), for POST too.
The configuration file is read from $HOME; the test runs this with an empty HOME.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import PureCloudPlatformClientV2 as sdk
from PureCloudPlatformClientV2.rest import ApiException


def new_client(base, mode):
    if mode == "host":
        return sdk.ApiClient(host=base)
    if mode == "gateway":
        url = urlsplit(base)
        client = sdk.ApiClient()
        client.set_gateway(
            host=url.hostname,
            protocol=url.scheme,
            port=url.port,
            path_params_login="login",
            path_params_api="api",
        )
        return client
    raise SystemExit(f"unknown mode {mode!r}: expected host or gateway")


def describe(error):
    """An HTTP status when the SDK got one, else the error's text."""
    if isinstance(error, ApiException) and error.status:
        return error.status
    return f"{type(error).__name__}: {error}"


def login(base, mode, client_id, client_secret):
    client = new_client(base, mode)
    try:
        client.get_client_credentials_token(client_id, client_secret)
        return client, None
    except Exception as error:  # noqa: BLE001 - every failure is reported, none crashes
        return None, describe(error)


def users_me(client):
    try:
        me = sdk.UsersApi(client).get_users_me()
        # The model lists every UserMe field; keep the ones the server sent.
        body = {k: v for k, v in me.to_dict().items() if v is not None}
        return {"status": client.last_response.status, "body": body}
    except ApiException as error:
        return {"status": error.status, "error": str(error.body or error.reason)}
    except Exception as error:  # noqa: BLE001
        return {"status": None, "error": describe(error)}


def main():
    if len(sys.argv) != 6:
        raise SystemExit(__doc__)
    base, mode, client_id, client_secret, n = sys.argv[1:]
    n = int(n)
    # The Configuration singleton is built on first use and that is not thread-safe: build it
    # here, and turn off its config-file watcher.
    sdk.Configuration().live_reload_config = False

    with ThreadPoolExecutor(max_workers=max(1, min(n, 32))) as pool:
        results = list(
            pool.map(lambda _: login(base, mode, client_id, client_secret), range(n))
        )
    clients = [c for c, _ in results if c is not None]
    errors = [e for _, e in results if e is not None]
    tokens = sorted({c.access_token for c in clients})
    report = {
        "logins_ok": len(clients),
        "login_errors": errors,
        "access_tokens": tokens,
        "users_me": users_me(clients[0]) if clients else {"status": None, "error": "no login"},
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
