// Drives the real Genesys Cloud JavaScript SDK (purecloud-platform-client-v2 262) at a base URL.
//
// Usage: node js_sdk.js BASE_URL MODE CLIENT_ID CLIENT_SECRET N
//   BASE_URL  http://127.0.0.1:PORT (the sidecar, or a fake that serves both login and API)
//   MODE      host     set-up (a): client.setGateway({host, protocol, port}), no path params
//             gateway  set-up (b): the same plus path_params_login: 'login', path_params_api: 'api'
//   N         client-credentials logins to make, each on its own ApiClient, all at once
// The SDK is loaded from NODE_PATH (the test points it at target/genesys-sdk/node/node_modules).
//
// Prints one JSON line on stdout (the last line):
//   {"logins_ok": n, "login_errors": [401, "..."], "access_tokens": [distinct tokens],
//    "users_me": {"status": 200, "body": {...}} | {"status": 401, "error": "..."}}
//
// What the SDK requests, read from its source (configuration.js getConfUrl, ApiClient.js):
//   host     POST http://H:P/oauth/token
//            GET  http://H:P/api/v2/users/me
//   gateway  POST http://H:P/login/oauth/token
//            GET  http://H:P/api/api/v2/users/me   (path_params_api is prepended to the resource
//                                                  path, which already starts /api/v2)
// Quirks: setEnvironment() cannot point at a sidecar: it strips the scheme and a leading "api."
// and always builds https://api.<env> and https://login.<env>, so set-up (a) in this SDK is the
// gateway without path params. The gateway protocol defaults to https; 'http' is honoured. The
// port must be a number > 0 (0 and '' mean "none"). The usable client class is ApiClientClass;
// the module's ApiClient is a ready-made singleton instance. HTTP goes through axios, which
// honours HTTP(S)_PROXY from the environment (the test clears them). The SDK does not retry 429.
// The configuration file is read from $HOME; the test runs this with an empty HOME.
'use strict';

const platformClient = require('purecloud-platform-client-v2');

function newClient(base, mode) {
  const url = new URL(base);
  const gateway = {
    host: url.hostname,
    protocol: url.protocol.replace(/:$/, ''),
    port: Number(url.port),
  };
  if (mode === 'gateway') {
    gateway.path_params_login = 'login';
    gateway.path_params_api = 'api';
  } else if (mode !== 'host') {
    throw new Error(`unknown mode ${JSON.stringify(mode)}: expected host or gateway`);
  }
  const client = new platformClient.ApiClientClass();
  // The test's HOME has no config file; stop watching for one.
  client.config.live_reload_config = false;
  client.setGateway(gateway);
  return client;
}

// An HTTP status when the SDK got one, else the error's text.
function describe(error) {
  if (error && error.response && error.response.status) return error.response.status;
  if (error && typeof error.status === 'number' && error.status > 0) return error.status;
  return String((error && error.message) || error);
}

async function login(base, mode, clientId, clientSecret) {
  const client = newClient(base, mode);
  try {
    const auth = await client.loginClientCredentialsGrant(clientId, clientSecret);
    return { client, token: auth.accessToken };
  } catch (error) {
    return { error: describe(error) };
  }
}

async function usersMe(client) {
  // Extended responses carry the HTTP status, on success and on failure alike.
  client.setReturnExtendedResponses(true);
  try {
    const res = await new platformClient.UsersApi(client).getUsersMe();
    return { status: res.status, body: res.body };
  } catch (res) {
    if (res && typeof res.status === 'number') {
      return { status: res.status, error: JSON.stringify(res.body) };
    }
    return { status: null, error: describe(res) };
  }
}

async function main() {
  const args = process.argv.slice(2);
  if (args.length !== 5) {
    console.error('usage: node js_sdk.js BASE_URL host|gateway CLIENT_ID CLIENT_SECRET N');
    process.exit(2);
  }
  const [base, mode, clientId, clientSecret, n] = args;
  const count = Number.parseInt(n, 10);
  const results = await Promise.all(
    Array.from({ length: count }, () => login(base, mode, clientId, clientSecret)),
  );
  const ok = results.filter((r) => r.client);
  const report = {
    logins_ok: ok.length,
    login_errors: results.filter((r) => !r.client).map((r) => r.error),
    access_tokens: [...new Set(ok.map((r) => r.token))].sort(),
    users_me: ok.length ? await usersMe(ok[0].client) : { status: null, error: 'no login' },
  };
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
