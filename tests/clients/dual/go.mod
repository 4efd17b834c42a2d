module keyhole.test/dual

go 1.26
