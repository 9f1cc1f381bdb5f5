# The two commands of the quick start: `make up` and `npm test` (which runs `make test`).
.PHONY: up test build deps bench clean

CONFIG ?= picocenter.yaml

up: build
	node dist/bin/picocenter.js up --config $(CONFIG)

test: build
	node --test --test-concurrency=1 dist/test/*.test.js

build: deps
	npx tsc -p tsconfig.json

deps:
	bash scripts/install.sh

bench: build
	bash scripts/install.sh --bench
	node dist/bench/http.js --runs 3
	node dist/bench/dns.js
	node dist/bench/wake.js --runs 3
	node dist/bench/restore.js --runs 5

clean:
