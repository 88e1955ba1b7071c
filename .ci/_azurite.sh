# Sourced after _venv.sh by .ci/test and .ci/campaigns: Azurite (the Azure Blob emulator)
# from npm into .cache/infra; the tests start it and moto_server themselves. Needs node/npm.
AZURITE_VERSION=3.37.0
if [ ! -x .cache/infra/node_modules/.bin/azurite-blob ]; then
  mkdir -p .cache/infra
  echo "installing azurite@$AZURITE_VERSION into .cache/infra (log: .cache/infra/npm.log)..."
  # azurite >= 3.36 declares node >= 22; on node 20 npm warns EBADENGINE, and blob works.
  if ! npm install --prefix .cache/infra --no-audit --no-fund --loglevel=error \
      "azurite@$AZURITE_VERSION" >.cache/infra/npm.log 2>&1; then
    tail -n 40 .cache/infra/npm.log >&2
    echo "npm install azurite failed" >&2
    exit 1
  fi
fi
