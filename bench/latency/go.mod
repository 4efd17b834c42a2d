module keyhole.dev/bench/latency

go 1.22
