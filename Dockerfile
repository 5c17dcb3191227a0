# The katcp-bridge image: katcp-bridge, katcpcmd and katcp-sim, static, on a
# distroless non-root base. The binaries are built by .ci/build, exactly as
# CI builds them.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN sh .ci/build /out

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/katcp-bridge"]
