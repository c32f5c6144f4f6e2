"""tensorwire inside vLLM: a KV connector (``KVConnectorBase_V1``) over tensorwire's pool, transport and controller.

``connector.TensorwireConnector`` is what vLLM loads (``kv_connector_module_path =
"tensorwire.integrations.vllm.connector"``); it needs vLLM, which lives in its own
environment (``scripts/setup-vllm.sh``). The rest imports no vLLM: ``layout`` maps vLLM's
paged CPU cache to per-token keys and values, ``scheduler`` and ``worker`` are the two sides
of the connector, ``transfer`` moves a prompt's KV from a prefill instance to a decode
instance, ``proxy`` is the front end of a prefill/decode pair, ``deploy`` starts one.
"""
