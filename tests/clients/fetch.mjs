// Node's built-in fetch, configured only by environment variables.
// Node >= 22.21 / 24 reads HTTP(S)_PROXY itself with NODE_USE_ENV_PROXY=1; older Node
// gets the same behaviour from undici's EnvHttpProxyAgent, installed as the global dispatcher.
// usage: node fetch.mjs METHOD URL [BODY]
const [major, minor] = process.versions.node.split('.').map(Number);
const native = major >= 24 || (major === 22 && minor >= 21);
if (!native) {
  const { EnvHttpProxyAgent, setGlobalDispatcher } = await import('undici');
  setGlobalDispatcher(new EnvHttpProxyAgent());
}
const [method, url, body] = process.argv.slice(2);
const response = await fetch(url, { method, body, redirect: 'manual' });
console.log(JSON.stringify({
  status: response.status,
  headers: [...response.headers],
  body: await response.text(),
  native,
}));
