"""Several hosts on one machine: network namespaces joined by veth links (topology) and rank
processes started inside them (nodes), for the multi-host tests and the TCP benchmark."""
